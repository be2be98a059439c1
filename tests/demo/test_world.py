"""The demo world and its REFER-format dataset: determinism, exact masks, true and unambiguous
expressions (checked by geometry written here, independently of the generator), and loading
through the project's own readers."""

from __future__ import annotations

import filecmp
import pickle
import re

import numpy as np
import pytest
import torch

from copatch.demo import world
from copatch.demo.dataset import KINDS, demo_image, expression_kinds, main, write_demo_refer

SEED = 1
NUM_IMAGES = 24
PALETTE = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 80, 215),
    "yellow": (230, 205, 40), "purple": (145, 55, 185), "orange": (240, 135, 30),
}
SHAPE_WORDS = {"circle", "square", "triangle", "star"}
SIZE_WORDS = {"small", "big"}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_refer(root, num_images=NUM_IMAGES, seed=SEED)
    return root


@pytest.fixture(scope="module")
def samples(demo_root):
    from copatch.datamodules.refer import ReferDataset

    dataset = ReferDataset(demo_root, dataset="demo", split_by="unc", split="val")
    return dataset, [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="module")
def instances(demo_root):
    import json

    data = json.loads((demo_root / "demo" / "instances.json").read_text())
    categories = {c["id"]: c["name"] for c in data["categories"]}
    by_image: dict[int, list[dict]] = {}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(ann["image_id"], []).append(ann | {"shape": categories[ann["category_id"]]})
    return by_image


# ----------------------------------------------------------------------------------- generator
def test_rendering_is_deterministic_from_the_seed():
    a = [world.sample_scene(np.random.default_rng(7), 64, (1, 4)) for _ in range(2)]
    assert a[0] == a[1]
    images = [world.render(s) for s in a]
    assert np.array_equal(images[0][0], images[1][0]) and np.array_equal(images[0][1], images[1][1])
    first, second = demo_image(SEED, 3), demo_image(SEED, 3)
    assert first[0] == second[0]
    assert all(np.array_equal(x, y) for x, y in zip(first[1:3] + first[4:], second[1:3] + second[4:]))
    assert first[3] == second[3]
    assert not np.array_equal(demo_image(SEED + 1, 3)[1], first[1])


def test_written_dataset_is_deterministic(tmp_path):
    for name in ("a", "b"):
        write_demo_refer(tmp_path / name, num_images=3, seed=5)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 3 + 3 + 2
    for rel in files:
        assert filecmp.cmp(tmp_path / "a" / rel, tmp_path / "b" / rel, shallow=False), rel


def test_eval_scenes_render_exact_visible_masks():
    rng = np.random.default_rng(11)
    overlapped = 0
    for _ in range(40):
        scene, image, masks = world.sample_eval_scene(rng)
        assert 2 <= len(scene.objects) <= 6 and image.shape == (128, 128, 3)
        full = world.full_masks(scene)
        overlapped += int((full.sum(0) > 1).any())
        assert (masks.sum(0) <= 1).all(), "visible masks must not overlap"
        for k, obj in enumerate(scene.objects):
            assert masks[k].any()
            assert np.array_equal((image == np.array(obj.rgb, dtype=np.uint8)).all(-1), masks[k])
            later = full[k + 1:].any(0)
            assert np.array_equal(masks[k], full[k] & ~later), "the later object occludes"
    assert overlapped > 0, "some evaluation scenes overlap"


# -------------------------------------------------------------------------------------- reader
def test_refer_files_load_with_targets_equal_to_instance_masks(samples, instances):
    dataset, items = samples
    assert len(items) == NUM_IMAGES
    for entry, sample in zip(dataset.entries, items):
        scene, image, masks, _, _ = demo_image(SEED, int(sample.image_id) - 1)
        assert torch.equal(sample.image, torch.from_numpy(image).permute(2, 0, 1))
        assert torch.equal(sample.instance_masks, torch.from_numpy(masks))
        for j, ann_id in enumerate(entry.target_ann_ids):
            assert torch.equal(sample.targets[j], sample.instance_masks[entry.ann_ids.index(ann_id)])
        anns = instances[int(sample.image_id)]
        assert [a["iscrowd"] for a in anns] == [0] * len(anns)
        assert all(isinstance(a["segmentation"]["counts"], str) for a in anns)


def test_masks_are_exact_object_pixels(samples, instances):
    _, items = samples
    for sample in items:
        image = sample.image.permute(1, 2, 0)
        for ann, mask in zip(instances[int(sample.image_id)], sample.instance_masks):
            rgb = torch.tensor(ann["attributes"]["rgb"], dtype=torch.uint8)
            assert torch.equal((image == rgb).all(-1), mask), ann["id"]
            assert int(mask.sum()) == ann["area"] > 0


def test_proposals_hold_every_instance_mask_and_distractors(demo_root, samples):
    from copatch.proposals import StoredProposals

    store = StoredProposals(demo_root / "proposals")
    _, items = samples
    for sample in items:
        proposals = store(sample)
        flat = proposals.masks.flatten(1)
        assert flat.any(1).all(), "no empty proposals"
        assert len({bytes(row.numpy().tobytes()) for row in flat}) == len(flat), "no duplicates"
        for mask in sample.instance_masks:
            assert int((flat == mask.flatten()).all(1).sum()) == 1
        assert len(proposals) >= len(sample.instance_masks) + 3


# ---------------------------------------------------------------------------------- expressions
def _objects(sample, anns):
    """Per instance: shape (category), colour (nearest palette colour of its pixels), size class,
    box centre and visible area, all computed here."""
    image = sample.image.permute(1, 2, 0).float()
    out = []
    for ann, mask in zip(anns, sample.instance_masks):
        mean = image[mask].mean(0)
        colour = min(PALETTE, key=lambda c: float(((mean - torch.tensor(PALETTE[c])) ** 2).sum()))
        assert colour == ann["attributes"]["colour"]
        ys, xs = torch.nonzero(mask, as_tuple=True)
        out.append({"shape": ann["shape"], "colour": colour, "size": ann["attributes"]["size"],
                    "x": (xs.min() + xs.max()).item() / 2, "y": (ys.min() + ys.max()).item() / 2,
                    "area": int(mask.sum())})
    return out


def _matches(objects, words: list[str]) -> set[int]:
    assert words and words[-1] in SHAPE_WORDS, words
    wanted = {}
    for w in words[:-1]:
        wanted["colour" if w in PALETTE else "size"] = w
        assert w in PALETTE or w in SIZE_WORDS, words
    return {k for k, o in enumerate(objects)
            if o["shape"] == words[-1] and all(o[key] == v for key, v in wanted.items())}


def _referents(text: str, objects) -> tuple[set[int], str]:
    """The objects `text` is true of, and the kind of expression it is."""
    if m := re.fullmatch(r"the (bigger|smaller) (\w+ \w+)", text):
        group = _matches(objects, m[2].split())
        assert len(group) >= 2
        best = (max if m[1] == "bigger" else min)(o["area"] for k, o in enumerate(objects) if k in group)
        return {k for k in group if objects[k]["area"] == best}, "attribute"
    if m := re.fullmatch(r"the ([\w ]+?) (on the left|on the right|at the top|at the bottom)", text):
        group = _matches(objects, m[1].split())
        assert len(group) >= 2, "a location word is needed only among look-alikes"
        key, pick = {"on the left": ("x", min), "on the right": ("x", max),
                     "at the top": ("y", min), "at the bottom": ("y", max)}[m[2]]
        best = pick(objects[k][key] for k in group)
        return {k for k in group if objects[k][key] == best}, "location"
    if m := re.fullmatch(r"the ([\w ]+?) (left of|right of|above|below) the (\w+ \w+)", text):
        anchor = _matches(objects, m[3].split())
        assert len(anchor) == 1
        (a,) = anchor
        group = _matches(objects, m[1].split()) - anchor
        assert len(group) >= 2, "the description alone must be ambiguous"
        test = {"left of": lambda o: o["x"] < objects[a]["x"], "right of": lambda o: o["x"] > objects[a]["x"],
                "above": lambda o: o["y"] < objects[a]["y"], "below": lambda o: o["y"] > objects[a]["y"]}[m[2]]
        return {k for k in group if test(objects[k])}, "relation"
    if m := re.fullmatch(r"the (\w+ \w+) (next to|near) the (\w+ \w+)", text):
        anchor = _matches(objects, m[3].split())
        assert len(anchor) == 1
        (a,) = anchor
        twins = _matches(objects, m[1].split())
        assert len(twins) >= 2, "context expressions are about look-alikes"

        def dist(k: int) -> float:
            return ((objects[k]["x"] - objects[a]["x"]) ** 2 + (objects[k]["y"] - objects[a]["y"]) ** 2) ** 0.5
        best = min(dist(k) for k in twins)
        return {k for k in twins if dist(k) == best}, "context"
    if m := re.fullmatch(r"the (\w+(?: \w+)?)", text):
        return _matches(objects, m[1].split()), "attribute"
    raise AssertionError(f"unexpected expression form: {text!r}")


def test_every_expression_is_true_and_unambiguous(demo_root, samples, instances):
    dataset, items = samples
    kinds = expression_kinds(demo_root)
    checked = 0
    for entry, sample in zip(dataset.entries, items):
        objects = _objects(sample, instances[int(sample.image_id)])
        for expression, ann_id in zip(sample.expressions, entry.target_ann_ids):
            referents, kind = _referents(expression.text, objects)
            target = entry.ann_ids.index(ann_id)
            assert referents == {target}, (sample.image_id, expression.text, referents, target)
            assert kinds[expression.id] == kind, expression.text
            checked += 1
    assert checked == dataset.num_expressions > 2 * NUM_IMAGES


def test_kinds_cover_all_four_and_every_sentence(demo_root, samples):
    dataset, items = samples
    kinds = expression_kinds(demo_root)
    assert set(kinds.values()) == set(KINDS)
    assert set(kinds) == {e.id for s in items for e in s.expressions}
    with open(demo_root / "demo" / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    for ref in refs:
        assert ref["split"] == "val" and ref["ref_id"] == ref["ann_id"]
        for s in ref["sentences"]:
            assert {"raw", "sent", "tokens", "sent_id", "kind"} <= set(s)
            assert s["tokens"] == s["sent"].split()
    subkinds = expression_kinds(demo_root, subkinds=True)
    assert set(subkinds.values()) == set(KINDS) | {"size"}


def test_cli_writes_a_readable_dataset(tmp_path, capsys):
    main(["--root", str(tmp_path / "cli"), "--num-images", "2", "--seed", "4"])
    assert '"images": 2' in capsys.readouterr().out
    assert (tmp_path / "cli" / "demo" / "refs(unc).p").is_file()
    assert len(list((tmp_path / "cli" / "proposals").glob("*.json"))) == 2
