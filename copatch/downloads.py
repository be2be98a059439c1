"""Every file a preset or proposer needs, where it goes, and the one command that fetches it.

copatch never downloads at run time (`HF_HUB_OFFLINE=1`): each file is fetched once, on a machine with
internet, with the command below, and copied to where the preset looks for it. Every missing-file error
prints the same command (`fetch_hint(key)`), and README's "Weights and where they go" table is this
table (a test keeps them equal).

    from copatch.downloads import fetch_hint
    raise UserFileNotFound(f"... does not exist. {fetch_hint('clip-vitb16')}")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Download", "DOWNLOADS", "fetch_hint", "download_for_clip", "markdown_table"]


@dataclass(frozen=True)
class Download:
    """One file or folder a preset or proposer needs.

    Attributes:
        key: the name used by `fetch_hint` (`clip-vitb16`, `mask2former`, `sam-vit-huge`, ...).
        what: what it is, for people.
        needed_by: the presets, configs or options that read it.
        command: the shell command that fetches it on a machine with internet, run in the project folder.
        destination: where it goes (relative to the folder copatch runs in), the path the configs name.
    """

    key: str
    what: str
    needed_by: str
    command: str
    destination: str


def _clip(key: str, repo: str, dest: str) -> str:
    # `hf download REPO FILE --local-dir DIR` writes DIR/FILE; the presets name one file per backbone.
    folder = f"weights/{key}"
    return (f"hf download {repo} open_clip_pytorch_model.bin --local-dir {folder} && "
            f"mv {folder}/open_clip_pytorch_model.bin {dest}")


def _hf_folder(repo: str, dest: str) -> str:
    return f"hf download {repo} --local-dir {dest}"


# What a SigLIP preset reads from its open_clip repository: the weights and, next to them, the tokenizer.
_OPEN_CLIP_FILES = "open_clip_config.json open_clip_model.safetensors tokenizer.json tokenizer_config.json special_tokens_map.json"


def _open_clip_folder(repo: str, dest: str) -> str:
    return f"hf download {repo} {_OPEN_CLIP_FILES} --local-dir {dest}"


_TABLE = [
    Download("clip-vitb32", "CLIP ViT-B/32 (OpenAI), open_clip format", "configs/model/vitb32.yaml, preset vitb32",
             _clip("clip-vitb32", "timm/vit_base_patch32_clip_224.openai", "weights/vitb32-openai.bin"),
             "weights/vitb32-openai.bin"),
    Download("clip-vitb16", "CLIP ViT-B/16 (OpenAI), open_clip format; also GEM's CLIP for every preset",
             "configs/model/*.yaml, preset vitb16 (and gem_pretrained of the other presets)",
             _clip("clip-vitb16", "timm/vit_base_patch16_clip_224.openai", "weights/vitb16-openai.bin"),
             "weights/vitb16-openai.bin"),
    Download("clip-vith14", "CLIP ViT-H/14 (LAION-2B), open_clip format", "configs/model/vith14.yaml, preset vith14",
             _clip("clip-vith14", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "weights/vith14-laion2b.bin"),
             "weights/vith14-laion2b.bin"),
    Download("clip-vith14-dfn", "CLIP ViT-H/14 (DFN-5B), open_clip format", "configs/model/vith14_dfn.yaml, preset vith14_dfn",
             _clip("clip-vith14-dfn", "apple/DFN5B-CLIP-ViT-H-14", "weights/vith14-dfn5b.bin"),
             "weights/vith14-dfn5b.bin"),
    Download("siglip-b16", "SigLIP ViT-B/16 (224 px), open_clip weights and tokenizer",
             "configs/model/siglip_b16.yaml, preset siglip_b16",
             _open_clip_folder("timm/ViT-B-16-SigLIP", "weights/siglip-b16"), "weights/siglip-b16"),
    Download("siglip2-b16-384", "SigLIP-2 ViT-B/16 (384 px, multilingual), open_clip weights and tokenizer",
             "configs/model/siglip2_b16.yaml, preset siglip2_b16",
             _open_clip_folder("timm/ViT-B-16-SigLIP2-384", "weights/siglip2-b16-384"), "weights/siglip2-b16-384"),
    Download("mask2former", "Mask2Former Swin-L (COCO panoptic), transformers folder",
             "configs/proposers/mask2former.yaml",
             _hf_folder("facebook/mask2former-swin-large-coco-panoptic", "weights/mask2former-swin-large-coco-panoptic"),
             "weights/mask2former-swin-large-coco-panoptic"),
    Download("sam-vit-huge", "SAM ViT-H, transformers folder", "configs/proposers/sam.yaml",
             _hf_folder("facebook/sam-vit-huge", "weights/sam-vit-huge"), "weights/sam-vit-huge"),
    Download("sam-vit-large", "SAM ViT-L, transformers folder", "SamProposer(model_dir=weights/sam-vit-large)",
             _hf_folder("facebook/sam-vit-large", "weights/sam-vit-large"), "weights/sam-vit-large"),
    Download("sam-vit-base", "SAM ViT-B, transformers folder", "SamProposer(model_dir=weights/sam-vit-base)",
             _hf_folder("facebook/sam-vit-base", "weights/sam-vit-base"), "weights/sam-vit-base"),
    Download("spacy-lg", "spaCy en_core_web_lg (the authors' parser model)", "--model.spacy_model en_core_web_lg",
             "python -m spacy download en_core_web_lg", ""),
    Download("stanza", "stanza English tokenize, pos, constituency", "configs/presets/paper.yaml (parser: stanza), with --model.stanza_resources stanza_resources",
             "python -c \"import stanza; stanza.download('en', processors='tokenize,pos,constituency', "
             "model_dir='stanza_resources')\"",
             "stanza_resources"),
]

DOWNLOADS: dict[str, Download] = {d.key: d for d in _TABLE}

# Which download an open_clip model name's weights come from (see configs/model/).
_CLIP_KEYS = {"ViT-B-32-quickgelu": "clip-vitb32", "ViT-B-16-quickgelu": "clip-vitb16", "ViT-H-14": "clip-vith14",
              "ViT-H-14-quickgelu": "clip-vith14-dfn", "ViT-B-16-SigLIP": "siglip-b16",
              "ViT-B-16-SigLIP2-384": "siglip2-b16-384"}


def download_for_clip(model_name: str) -> Download | None:
    """The download of the official weights for an open_clip model name, or None for other models."""
    key = _CLIP_KEYS.get(model_name)
    return DOWNLOADS[key] if key else None


def fetch_hint(key: str, destination: str | None = None) -> str:
    """One sentence: the command that fetches `key` on a machine with internet and where it goes.

    Args:
        key: a key of `DOWNLOADS`.
        destination: where the user's config expects it, when not the default (the command is
            rewritten to write there).
    """
    item = DOWNLOADS[key]
    command, dest = item.command, item.destination or "the virtual environment"
    if destination and item.destination and Path(destination).suffix and not Path(item.destination).suffix:
        destination = str(Path(destination).parent)  # a file (the SigLIP weights) inside the folder fetched
    if destination and item.destination and destination != item.destination:
        command = command.replace(item.destination, destination).replace("'stanza_resources'", repr(destination))
        dest = destination
    where = "copy the result here" if dest in command else f"it goes to {dest}"
    return f"Fetch it on a machine with internet: `{command}` ({where}). Nothing is downloaded at run time."


def _where(item: Download) -> str:
    return f"`{item.destination}`" if item.destination else "the virtual environment (a pip package)"


def markdown_table() -> str:
    """README's "Weights and where they go" table."""
    rows = ["| file | needed by | command (on a machine with internet) | goes to |", "|---|---|---|---|"]
    rows += [f"| {d.what} | {d.needed_by} | `{d.command}` | {_where(d)} |" for d in _TABLE]
    return "\n".join(rows)
