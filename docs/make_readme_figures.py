"""Write the README's figure of a batch-size race (``docs/race.png``), trained here, headless.

The panel screenshot (``docs/panel.png``) comes from the browser test:
``NBBATCH_SCREENSHOTS=docs/shots pytest tests/browser`` then ``python docs/make_readme_figures.py --panel docs/shots/panel.png``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from nbbatch import data  # noqa: E402
from nbbatch.ui import compare  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--panel", default=None, help="a panel screenshot to shrink into docs/panel.png")
    ap.add_argument("--epochs", type=float, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rc = compare((16, 128, 1024), lr=0.05, base_batch_size=64, scale_rule="linear", data=data.mnist1d(),
                 epochs=args.epochs, headless=True)
    rc.figure().savefig(os.path.join(HERE, "race.png"), dpi=80)
    rc.close()
    if args.panel:
        from PIL import Image

        img = Image.open(args.panel).convert("RGB")
        img.thumbnail((900, 2000))
        img.quantize(colors=128).save(os.path.join(HERE, "panel.png"), optimize=True)


if __name__ == "__main__":
    main()
