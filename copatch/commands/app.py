"""`copatch app`: the web demo, a Gradio page at http://127.0.0.1:7860 (needs `pip install 'copatch[app]'`).

Upload an image (or pick a demo scene), type one or more expressions and see, for each, the chosen mask,
the candidates with their scores, the CoMap clusters, the similarity map and the parse; download the mask
as a PNG. Context tokens, patch negation, CoMap and spatial guidance can be toggled per request
(`copatch/app.py`).

The demo preset (the default) runs with nothing but the install. Real weights work when they are on
disk: `--preset vitb16 --clip-checkpoint FILE --proposer sam --proposer-dir DIR`. Nothing is ever
downloaded: no model hub, no web fonts, no analytics. The model is loaded once, before the page is
served; requests queue and run one at a time.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import sys

from copatch.commands.options import add_model_options

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub at run time
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no analytics, no version check

HELP = "the web demo: copatch app [--preset demo] [--port 7860], a Gradio page (pip install 'copatch[app]')"

MAX_SIDE = 2048  # copatch.app.MAX_SIDE (kept here so that `copatch app --help` imports nothing heavy)

EXAMPLES = """examples:
  copatch app                                   # the demo preset, http://127.0.0.1:7860
  copatch app --port 8080 --host 0.0.0.0        # reachable from other machines
  copatch app --preset vitb16 --clip-checkpoint weights/vitb16-openai.bin \\
      --proposer mask2former --proposer-dir weights/mask2former-swin-large-coco-panoptic
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="copatch app", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Serve the web demo: upload an image, type expressions, see the chosen masks with the "
                    "candidates, CoMap clusters, similarity maps and parses. Runs offline.")
    add_model_options(parser, "<image id>.json")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default: %(default)s, this machine only; 0.0.0.0 for all)")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE, metavar="PX",
                        help="refuse images with a longer side (default: %(default)s)")
    return parser


def _error(message: str) -> Exception:
    from copatch.errors import UserValueError

    return UserValueError(message)


def check_gradio() -> None:
    """Gradio is an extra: a short error with the install command when it is missing."""
    if importlib.util.find_spec("gradio") is None:
        from copatch.errors import UserError

        raise UserError("the web demo needs Gradio, which is not installed: pip install 'copatch[app]' "
                        "(or pip install -e \".[app]\" in a checkout).")


def main(argv: list[str]) -> int:
    """`copatch app ...`; serves until interrupted and returns the exit status."""
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise _error(f"--port {args.port} is not a port number: give one in 1-65535 (e.g. 7860).")
    if args.max_side < 2:
        raise _error(f"--max-side {args.max_side} is too small: give at least 2 (pixels).")
    check_gradio()

    from copatch.commands.segment import _proposer
    from copatch.presets import PRESETS

    if args.preset not in PRESETS:
        raise _error(f"unknown --preset {args.preset!r}: use one of {', '.join(sorted(PRESETS))}.")
    proposer = _proposer(argparse.Namespace(proposals=None, proposer=args.proposer, preset=args.preset,
                                            proposer_dir=args.proposer_dir))

    from copatch.app import CoPatchApp, launch

    app = CoPatchApp.from_preset(args.preset, clip_checkpoint=args.clip_checkpoint, proposer=proposer,
                                 max_side=args.max_side)
    print(f"copatch app: {app.describe().replace('`', '')}", flush=True)
    if not _loopback(args.host):
        print(f"copatch app: serving on {args.host}: the page is reachable from other machines.", file=sys.stderr)
    try:
        launch(app, host=args.host, port=args.port)
    except OSError as err:
        raise _error(f"cannot serve on {args.host}:{args.port} ({err}): the port may be in use; pass another "
                     "--port.") from err
    except KeyboardInterrupt:
        pass
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
