"""`copatch compare`: several methods (`copatch.methods`) over one dataset and one set of proposals, in
one pass, and the table and chart of their results.

    copatch compare --config configs/demo.yaml --methods global_local,hybridgl,copatch
    copatch compare --config configs/model/vitb16.yaml --config configs/data/refcoco.yaml \
        --proposer mask2former --methods global_local,hybridgl,copatch --output outputs/refcoco-compare

Each method is the config composed as `copatch predict` would compose it: every `--config`, then the
proposer's (`--proposer NAME` is `configs/proposers/NAME.yaml`, or a file), then the method's preset
(`configs/methods/<name>.yaml`; a `--methods` entry may also be such a YAML file), then the other
options (`--model.*`, `--data.*`, `--trainer.*`), which so apply to every method. A method may only
change `model` options, and all must share the proposer and `max_side`.

What is shared. The images are read and proposed once per batch, for all methods. The CLIP (and GEM
CLIP) weights are loaded once and shared by every method that names the same files. The image-side
features (global-local mask embeddings, exit-layer patches, GEM patches: `CoPatch.image_side`) are
computed once per image for each group of methods whose image-side settings are equal (every switch
and argument but the expression-side ones, `EXPRESSION_SWITCHES` and `EXPRESSION_ARGUMENTS`); the
three methods of the usual table are one group, `copatch_paper` (other input normalisation, crop
fill and mix) a second. Then each method runs its own expression side (parse, text, CoMap, candidates,
pick) on them. The results are those of separate runs (a test checks it on the demo world): every
method is a real `CoPatch` whose `predict_image` runs unchanged, only its `image_side` is served from
the group's cache.

Written under `--output` (default: the config's `trainer.default_root_dir` + `-compare`):

- `<method>/`: what `copatch predict` writes for that method (`run.json`, `predictions.rank*.jsonl`,
  `metrics.json`) and `config.yaml`, the method's composed config for `copatch predict` writing that
  dir; a rerun (of either command) resumes each method, and `copatch evaluate <output>/<method>`
  recomputes its metrics;
- `comparison.md`: the tables (oIoU, mIoU, Pr@X, the top-3 oracle; mIoU and the oracle by expression
  kind when the dataset labels kinds, as the demo world does), also printed;
- `comparison.json`: the same numbers; `comparison.png` (or `--chart`): a bar chart.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pickle
import shutil
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from copatch.errors import UserFileNotFound, UserValueError
from copatch.methods import DEFAULT_METHODS, METHODS, method_config
from copatch.module import CoPatch
from copatch.prepare import SamplePreparer
from copatch.run_state import final_lines, jsonable, object_fingerprint, read_predictions
from copatch.switches import Switches

__all__ = ["EXPRESSION_ARGUMENTS", "EXPRESSION_SWITCHES", "MethodSet", "SharedImageSide", "compare",
           "draw_chart", "markdown_tables", "summarize"]

# Switches and arguments read only after the image side (`CoPatch.expression_side`, `encode_text`,
# `parse`). Every other one is taken as image-side, so an unknown new switch splits groups rather than
# sharing features it should not. `spatial_guidance` is here because a group's image side is computed
# by a member that has it on (GEM patches then exist for all) and each member checks its own
# `usable_proposals`.
EXPRESSION_SWITCHES = frozenset({
    "similarity_norm", "clustering", "first_threshold", "cluster_order", "cluster_binarize", "keep_last_cluster",
    "box_format", "nan_policy", "text_features", "parser", "use_comap", "spatial_guidance"})
EXPRESSION_ARGUMENTS = frozenset({
    "delta", "alpha", "top_k", "gamma", "switches", "spacy_model", "stanza_resources", "parse_cache_dir",
    "parse_in_workers", "save_in_checkpoint"})
THRESHOLDS = ("Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9")
PREFERRED_KINDS = ("attribute", "location", "relation", "context")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ------------------------------------------------------------------------------------- sharing
class SharedImageSide:
    """`CoPatch.image_side` computed once per image for a group of methods with equal image-side settings.

    `owner` (a member with the spatial guidance on, when one has it, so that GEM patches are computed)
    runs the built-in `image_side`; when its proposals are not usable for it but are for a member (a
    whole-image mask is usable without the spatial guidance), it still encodes them. Every member then
    gets the proposals and, when `usable_proposals` holds for it, the features; an `InputFailure` is
    raised for every member alike. `reset()` before each image.
    """

    def __init__(self, owner: CoPatch, members: list[CoPatch]) -> None:
        self.owner, self.members = owner, members
        self.computed = 0  # image sides computed (for the tests and the log)
        self.reset()

    def reset(self) -> None:
        self._key: Any = None
        self._value: Any = None

    def __call__(self, model: CoPatch, sample: Any) -> tuple[torch.Tensor, Any]:
        key = (str(sample.image_id), tuple(sample.size), sample.file_name)
        if key != self._key:
            try:
                masks, feats = CoPatch.image_side(self.owner, sample)
                if feats is None and any(m.usable_proposals(masks) for m in self.members):
                    feats = self.owner.encode_image(sample, masks)
                self._value = (masks, feats)
            except Exception as err:  # noqa: BLE001 - the same failure for every member
                self._value = err
            self._key = key
            self.computed += 1
        if isinstance(self._value, Exception):
            raise self._value
        masks, feats = self._value
        return masks, (feats if model.usable_proposals(masks) else None)


def image_side_key(model: CoPatch) -> str:
    """What a model's image side depends on (all but `EXPRESSION_SWITCHES` / `EXPRESSION_ARGUMENTS`)."""
    hparams = {k: v for k, v in jsonable(dict(model.hparams)).items() if k not in EXPRESSION_ARGUMENTS}
    switches = {f.name: getattr(model.switches, f.name) for f in fields(Switches) if f.name not in EXPRESSION_SWITCHES}
    return json.dumps({"class": type(model).__qualname__, "hparams": hparams, "switches": switches}, sort_keys=True,
                      default=str)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def share_encoders(models: list[CoPatch]) -> int:
    """Make models that name the same CLIP (and GEM CLIP) use one module; returns how many were replaced.

    Shared when the model names, configs and weight files are equal (random weights: when equal too).
    """
    replaced = 0
    for attr, names in (("backbone", ("clip_model", "clip_pretrained", "clip_config")),
                        ("gem_clip", ("gem_model", "gem_pretrained"))):
        kept: list[tuple[tuple, nn.Module]] = []
        for m in models:
            module = getattr(m, attr)
            if module is None:
                continue
            key = tuple(m.hparams.get(n) for n in names)
            random = not m.hparams.get(names[1])
            for other_key, other in kept:
                if other_key == key and (not random or _same_weights(module, other)):
                    setattr(m, attr, other)
                    replaced += 1
                    break
            else:
                kept.append((key, module))
    return replaced


class MethodSet(pl.LightningModule):
    """Several `CoPatch` methods run image by image in one `Trainer.predict` (`compare`).

    Each method keeps its own `PredictionWriter` (its own output dir, resume and `metrics.json`),
    driven from this module's hooks with the method as the module. Proposals are made once per batch
    (the first method's `propose_together`, all methods sharing its proposer) and image features once
    per image per `SharedImageSide` group.

    Args:
        models: `{name: CoPatch}`, sharing one proposer.
        writers: `{name: PredictionWriter}` with their output dirs.
    """

    def __init__(self, models: dict[str, CoPatch], writers: dict[str, Any]) -> None:
        super().__init__()
        self.methods = nn.ModuleDict(models)
        self.writers = writers
        groups: dict[str, list[CoPatch]] = {}
        for m in models.values():
            groups.setdefault(image_side_key(m), []).append(m)
        self.groups = []
        for members in groups.values():
            owner = next((m for m in members if m.switches.spatial_guidance), members[0])
            shared = SharedImageSide(owner, members)
            for m in members:
                m.image_side = functools.partial(shared, m)  # the extension point, per instance
            self.groups.append(shared)

    def release(self) -> None:
        """Give every method its own `image_side` back."""
        for m in self.methods.values():
            m.__dict__.pop("image_side", None)

    def _each(self):
        return [(name, m, self.writers[name]) for name, m in self.methods.items()]

    def setup(self, stage: str) -> None:
        for _, m, writer in self._each():
            m.trainer = self.trainer
            m.setup(stage)
            writer.setup(self.trainer, m, stage)
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "sample_transform"):  # every method's CPU steps, once each
            steps: dict[str, Any] = {}
            for m in self.methods.values():
                for step in m.sample_preparer().steps:
                    steps.setdefault(f"{type(step).__qualname__}:{step.key((64, 64))}", step)
            dm.sample_transform = SamplePreparer(tuple(steps.values())) or None

    def on_predict_start(self) -> None:
        for _, m, writer in self._each():
            m.on_predict_start()
            writer.on_predict_start(self.trainer, m)

    def on_predict_epoch_start(self) -> None:
        for m in self.methods.values():
            m.on_predict_epoch_start()

    def predict_step(self, batch: list, batch_idx: int = 0, dataloader_idx: int = 0) -> list:
        models = list(self.methods.values())
        todo = [s for s in batch if any(m.pending(s) is not None for m in models)]
        outputs: dict[str, list] = {name: [] for name in self.methods}
        for sample in models[0].propose_together(todo):
            for shared in self.groups:
                shared.reset()
            for name, m in self.methods.items():
                pending = m.pending(sample)
                if pending is not None:
                    outputs[name].extend(m.predict_image(pending))
        for name, m, writer in self._each():
            writer.write_on_batch_end(self.trainer, m, outputs[name], None, batch, batch_idx, dataloader_idx)
        return []  # written above (a None would make Lightning warn)

    def on_predict_epoch_end(self) -> None:
        for _, m, writer in self._each():
            writer.on_predict_epoch_end(self.trainer, m)
            m.on_predict_epoch_end()

    def on_predict_end(self) -> None:
        for m in self.methods.values():
            m.on_predict_end()


# ------------------------------------------------------------------------------------- building
@dataclass
class Setup:
    """The parsed methods: their models, one Trainer and DataModule, and each method's config text."""

    models: dict[str, CoPatch]
    trainer: pl.Trainer
    datamodule: Any
    configs: dict[str, Any]  # each method's parsed config (a jsonargparse Namespace)
    parser: Any  # the parser that dumps them
    default_root_dir: str

    def config_text(self, name: str, output_dir: Path) -> str:
        """The method's config as `copatch predict` takes it, writing (and so resuming) `output_dir` with
        a PredictionWriter only: `copatch predict --config <output_dir>/config.yaml` reruns the method."""
        from jsonargparse import Namespace

        cfg = self.configs[name].clone()
        cfg.trainer.default_root_dir = str(output_dir)
        cfg.trainer.callbacks = [Namespace(class_path="copatch.callbacks.prediction_writer.PredictionWriter",
                                           init_args=Namespace(output_dir=None, with_masks=True, png=False))]
        cfg.pop("config", None)
        return self.parser.dump(cfg, skip_none=False)


def method_source(spec: str) -> tuple[str, str]:
    """`(name, --config value)` of a `--methods` entry: a preset name or a YAML file."""
    if spec in METHODS:
        return spec, json.dumps(method_config(spec))
    path = Path(spec)
    if spec.endswith((".yaml", ".yml", ".json")):
        if not path.is_file():
            raise UserFileNotFound(f"method file {spec} not found: give a preset name ({', '.join(METHODS)}) or a "
                                   "YAML file of model options (see configs/methods/).")
        return path.stem, str(path)
    raise UserValueError(f"unknown method {spec!r}: use preset names ({', '.join(METHODS)}; configs/methods/) or "
                         "YAML files, comma-separated, e.g. --methods global_local,hybridgl,copatch.")


def proposer_config(spec: str) -> str:
    """The config file of `--proposer`: a file, or `configs/proposers/<name>.yaml`."""
    if Path(spec).is_file():
        return spec
    path = CONFIGS / "proposers" / f"{spec}.yaml"
    if path.is_file():
        return str(path)
    known = sorted(p.stem for p in (CONFIGS / "proposers").glob("*.yaml"))
    raise UserFileNotFound(f"proposer {spec!r} is neither a file nor one of configs/proposers/ ({', '.join(known)}).")


def build(configs: list[str], methods: list[str], proposer: str | None, rest: list[str]) -> Setup:
    """One `CoPatch` per method from the composed configs (see the module docstring)."""
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.callbacks import BasePredictionWriter

    from copatch.commands.predict import CoPatchCLI, quiet_lightning
    from copatch.errors import cli_words, interface_words

    class _CompareCLI(CoPatchCLI):
        """`copatch predict`'s parser without running: a config written for predict may hold its
        subcommand's options (`return_predictions`, `ckpt_path`), which do not matter here."""

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument("--return_predictions", type=bool | None, default=None)
            parser.add_argument("--ckpt_path", type=str | None, default=None)

    quiet_lightning()
    base = [a for c in configs for a in ("--config", c)]
    if proposer is not None:
        base += ["--config", proposer_config(proposer)]
    sources = [method_source(spec) for spec in methods]  # every name checked before any model loads
    names = [name for name, _ in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserValueError(f"method {twice[0]!r} is given twice in --methods.")
    models: dict[str, CoPatch] = {}
    configs: dict[str, Any] = {}
    first: Any = None
    for name, source in sources:
        with interface_words(cli_words):
            cli = _CompareCLI(CoPatch, LightningDataModule, subclass_mode_data=True, seed_everything_default=0,
                             save_config_callback=None, auto_configure_optimizers=False, run=False,
                             parser_kwargs={"exit_on_error": False}, args=[*base, "--config", source, *rest])
        configs[name] = cli.config
        if first is None:
            first = cli
        else:
            for section in ("trainer", "data", "seed_everything"):
                if cli.config.get(section) != first.config.get(section):
                    raise UserValueError(f"method {name!r} changes the {section} options: a method may only set "
                                         "model options (all methods run on one dataset with one trainer).")
        models[name] = cli.model
    # One proposer for all: the same proposals, made once.
    ref = next(iter(models.values()))

    def proposer_of(model: CoPatch) -> Any:
        return None if model.proposer is None else object_fingerprint(model.proposer)

    for name, m in models.items():
        if proposer_of(m) != proposer_of(ref):
            raise UserValueError(f"method {name!r} sets another proposer: all methods must run on the same proposals.")
        if m.hparams.get("max_side") != ref.hparams.get("max_side"):
            raise UserValueError(f"method {name!r} sets another max_side: all methods must run on the same proposals.")
        m.proposer = ref.proposer
    share_encoders(list(models.values()))
    trainer = first.trainer
    # The configured writers are `copatch predict`'s; here each method has its own.
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, BasePredictionWriter)
                            and not type(c).__module__.startswith("copatch.callbacks")]
    return Setup(models, trainer, first.datamodule, configs, first.parser, str(first.config.trainer.default_root_dir))


# ------------------------------------------------------------------------------------- results
def expression_kinds(datamodule: Any) -> dict[str, str]:
    """`{id_key: kind}` when the dataset labels its expressions with kinds (the demo world's REFER
    sentences carry `kind`; a DataModule may also offer `expression_kinds()`), else `{}`."""
    own = getattr(datamodule, "expression_kinds", None)
    if callable(own):
        return {str(k): str(v) for k, v in own().items()}
    root, name, split_by = (getattr(datamodule, a, None) for a in ("root", "dataset_name", "split_by"))
    if not (root and name and split_by):
        return {}
    path = Path(root) / name / f"refs({split_by}).p"
    try:
        with open(path, "rb") as f:
            refs = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError):
        return {}
    return {str(s["sent_id"]): str(s["kind"]) for r in refs for s in r.get("sentences", []) if "kind" in s}


def summarize(output: Path, names: list[str], kinds: dict[str, str]) -> dict[str, Any]:
    """The numbers of the tables: each method's `metrics.json` and, by kind, the mean IoU and top-3
    oracle IoU of its final prediction lines (percent)."""
    rows: dict[str, Any] = {}
    counts: dict[str, int] = defaultdict(int)
    for name in names:
        root = output / name
        metrics = json.loads((root / "metrics.json").read_text())["metrics"]
        lines = [r for r in final_lines(read_predictions(root)).values() if r.get("inter") is not None]
        by_kind: dict[str, list[float]] = defaultdict(list)
        oracle_by_kind: dict[str, list[float]] = defaultdict(list)
        for r in lines:
            kind = kinds.get(str(r["id"]))
            if kind is None:
                continue
            by_kind[kind].append(float(r.get("iou") or 0.0))
            oracle_by_kind[kind].append(float(r.get("oracle_iou") or 0.0))
        if name == names[0]:
            counts.update({k: len(v) for k, v in by_kind.items()})
        rows[name] = {"metrics": metrics,
                      "mIoU_by_kind": {k: 100 * sum(v) / len(v) for k, v in by_kind.items()},
                      "oracle_mIoU_by_kind": {k: 100 * sum(v) / len(v) for k, v in oracle_by_kind.items()}}
    order = [k for k in PREFERRED_KINDS if k in counts] + sorted(k for k in counts if k not in PREFERRED_KINDS)
    return {"methods": rows, "kinds": order, "kind_counts": {k: counts[k] for k in order}}


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def markdown_tables(summary: dict[str, Any]) -> str:
    """The comparison as Markdown: the overall metrics, then mIoU and the oracle by kind (if kinds)."""
    rows = summary["methods"]
    n = next(iter(rows.values()))["metrics"].get("n")
    head = ["method", "oIoU", "mIoU", *THRESHOLDS, "top-3 oracle oIoU", "top-3 oracle mIoU"]
    lines = [f"Overall ({int(n)} expressions; %)" if n else "Overall (%)", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, row in rows.items():
        m = row["metrics"]
        cells = [m.get("oIoU"), m.get("mIoU"), *(m.get(t) for t in THRESHOLDS), m.get("oracle_oIoU"),
                 m.get("oracle_mIoU")]
        lines.append(f"| {name} | " + " | ".join(_fmt(c) for c in cells) + " |")
    kinds = summary["kinds"]
    if kinds:
        counts = summary["kind_counts"]
        total = sum(counts.values())
        for title, key, overall in (("mIoU by expression kind (%; expressions in brackets)", "mIoU_by_kind", "mIoU"),
                                    ("Top-3 oracle mIoU by expression kind (%)", "oracle_mIoU_by_kind",
                                     "oracle_mIoU")):
            head = ["method", *(f"{k} ({counts[k]})" for k in kinds), f"all ({total})"]
            lines += ["", title, "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
            for name, row in rows.items():
                cells = [row[key].get(k) for k in kinds] + [row["metrics"].get(overall)]
                lines.append(f"| {name} | " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


PALETTE = ((55, 126, 184), (228, 26, 28), (77, 175, 74), (152, 78, 163), (255, 127, 0), (166, 86, 40))


def draw_chart(summary: dict[str, Any], path: str | os.PathLike, title: str = "Method comparison") -> Path:
    """A grouped bar chart (PNG, drawn with PIL): oIoU, mIoU, Pr@0.5 and the top-3 oracle mIoU per
    method, then mIoU per expression kind when there are kinds; value labels on the bars."""
    from PIL import Image, ImageDraw, ImageFont

    rows = summary["methods"]
    names = list(rows)
    groups = [("oIoU", lambda r: r["metrics"].get("oIoU")), ("mIoU", lambda r: r["metrics"].get("mIoU")),
              ("Pr@0.5", lambda r: r["metrics"].get("Pr@0.5")),
              ("top-3 oracle\nmIoU", lambda r: r["metrics"].get("oracle_mIoU"))]
    counts = summary.get("kind_counts", {})
    groups += [(f"mIoU\n{k} ({counts.get(k, '?')})", (lambda k: lambda r: r["mIoU_by_kind"].get(k))(k))
               for k in summary["kinds"]]
    values = [[g(rows[n]) for n in names] for _, g in groups]
    finite = [v for vs in values for v in vs if v is not None and not math.isnan(v)]
    top = max(10.0, math.ceil((max(finite) if finite else 10.0) / 10.0) * 10.0)

    scale = 2  # drawn at twice the size, for crisp text
    def font(size: int):
        try:
            return ImageFont.load_default(size=size * scale)
        except TypeError:  # an old Pillow without a scalable default font
            return ImageFont.load_default()

    f_title, f_label, f_small = font(16), font(12), font(10)
    bar_w, gap = 22, 26
    group_w = len(names) * bar_w + gap
    left, right, top_m, bottom = 56, 20, 70, 70
    plot_h = 300
    width = left + right + len(groups) * group_w
    height = top_m + plot_h + bottom
    img = Image.new("RGB", (width * scale, height * scale), "white")
    d = ImageDraw.Draw(img)
    S = lambda v: int(round(v * scale))  # noqa: E731
    y_of = lambda v: top_m + plot_h * (1 - v / top)  # noqa: E731

    d.text((S(left), S(12)), title, fill="black", font=f_title)
    x = left  # legend
    for i, name in enumerate(names):
        colour = PALETTE[i % len(PALETTE)]
        d.rectangle([S(x), S(40), S(x + 12), S(52)], fill=colour)
        d.text((S(x + 16), S(38)), name, fill="black", font=f_label)
        x += 16 + d.textlength(name, font=f_label) / scale + 18
    for tick in range(0, int(top) + 1, 10):  # axis and grid
        y = y_of(tick)
        d.line([S(left), S(y), S(width - right), S(y)], fill=(225, 225, 225) if tick else (90, 90, 90), width=scale)
        label = str(tick)
        d.text((S(left - 8) - d.textlength(label, font=f_small), S(y - 7)), label, fill=(90, 90, 90), font=f_small)
    d.text((S(6), S(top_m - 18)), "%", fill=(90, 90, 90), font=f_small)
    for g, ((label, _), vals) in enumerate(zip(groups, values)):
        x0 = left + g * group_w + gap / 2
        for i, v in enumerate(vals):
            if v is None or math.isnan(v):
                continue
            colour = PALETTE[i % len(PALETTE)]
            bx = x0 + i * bar_w
            d.rectangle([S(bx + 1), S(y_of(v)), S(bx + bar_w - 1), S(y_of(0))], fill=colour)
            text = f"{v:.0f}"
            tw = d.textlength(text, font=f_small) / scale
            d.text((S(bx + bar_w / 2 - tw / 2), S(y_of(v) - 14)), text, fill="black", font=f_small)
        if g == 4:  # the kinds start here
            xs = left + g * group_w
            d.line([S(xs), S(top_m - 6), S(xs), S(top_m + plot_h + 44)], fill=(160, 160, 160), width=scale)
        for j, word in enumerate(label.split("\n")):
            tw = d.textlength(word, font=f_label) / scale
            d.text((S(x0 + len(names) * bar_w / 2 - tw / 2), S(top_m + plot_h + 8 + 16 * j)), word, fill="black",
                   font=f_label)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)
    return path


# ------------------------------------------------------------------------------------- the command
def compare(configs: list[str], methods: list[str], proposer: str | None = None, output: str | None = None,
            chart: str | None = None, rest: list[str] | None = None) -> dict[str, Any]:
    """Run the methods over the composed config in one pass and write their results (module docstring).

    Returns:
        The summary (`comparison.json`), with `output`, `markdown` and `chart` added.
    """
    from copatch.callbacks.prediction_writer import PredictionWriter
    from copatch.commands.predict import check_output_dir
    from copatch.evaluate import hold_results

    setup = build(configs, methods, proposer, list(rest or []))
    out = Path(output) if output else Path(str(setup.default_root_dir).rstrip("/") + "-compare")
    writers = {}
    for name, model in setup.models.items():
        check_output_dir(out / name)
        model.check_ready()
        writers[name] = PredictionWriter(output_dir=str(out / name))
    method_set = MethodSet(setup.models, writers)
    hold_results(True)  # each method's own report: the tables below say it all
    try:
        setup.trainer.predict(method_set, datamodule=setup.datamodule, return_predictions=False)
    finally:
        hold_results(False)
        method_set.release()
    if not setup.trainer.is_global_zero:
        return {}
    for name in setup.models:
        (out / name / "config.yaml").write_text(setup.config_text(name, out / name))
    names = list(setup.models)
    summary = summarize(out, names, expression_kinds(setup.datamodule))
    summary["image_sides"] = {name: next(g.computed for g in method_set.groups if m in g.members)
                              for name, m in setup.models.items()}
    text = markdown_tables(summary)
    (out / "comparison.md").write_text(text)
    dm = setup.datamodule
    where = " ".join(str(getattr(dm, a)) for a in ("dataset_name", "split") if getattr(dm, a, None)) or out.name
    n = next(iter(summary["methods"].values()))["metrics"].get("n")
    chart_path = draw_chart(summary, out / "comparison.png",
                            title=f"{where}: {int(n) if n else '?'} expressions, the same proposals for every method")
    if chart:
        Path(chart).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chart_path, chart)
    (out / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = {n: json.loads((out / n / "metrics.json").read_text()).get("failures", 0) for n in names}
    notes = [f"{n}: {k} expressions could not be evaluated (IoU 0): {out / n / 'failures.jsonl'}"
             for n, k in failed.items() if k]
    print(text + ("\n" + "\n".join(notes) if notes else ""), flush=True)
    print("Wrote:\n  " + "\n  ".join([*(f"{out / n}/" for n in names), str(out / "comparison.md"),
                                       str(out / "comparison.json"), str(chart_path), *([chart] if chart else [])]),
          flush=True)
    return {**summary, "output": str(out), "markdown": text, "chart": str(chart or chart_path)}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="copatch compare", allow_abbrev=False,
        description="Run several methods (configs/methods/) over one dataset and one set of proposals in one pass "
                    "(proposals and image features shared) and write each method's predictions and metrics.json, "
                    "a Markdown table and a bar chart. Options other than these (--model.*, --data.*, --trainer.*) "
                    "apply to every method, after its preset.")
    parser.add_argument("--config", action="append", default=[], help="a config file, as for copatch predict "
                        "(repeat to compose: model, data, trainer)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated method presets ({', '.join(METHODS)}) or YAML files of model options "
                             f"(default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--proposer", default=None, help="configs/proposers/NAME.yaml (stored, sam, mask2former, "
                        "ground_truth, demo_regions) or a file; default: the config's proposer")
    parser.add_argument("--output", default=None, help="output dir (default: trainer.default_root_dir + '-compare')")
    parser.add_argument("--chart", default=None, help="also copy the bar chart PNG here")
    return parser.parse_known_args(argv)


def main(argv: list[str]) -> int:
    """`copatch compare ...`; returns the exit status."""
    args, rest = parse_args(argv)
    if not args.config:
        raise UserValueError("copatch compare needs at least one --config (e.g. --config configs/demo.yaml).")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UserValueError("--methods is empty: name at least one method, e.g. --methods global_local,copatch.")
    compare(args.config, methods, args.proposer, args.output, args.chart, rest)
    return 0
