"""What the tests share: tiny models (:mod:`.models`), tiny datasets (:mod:`.data`), tiny
training configs (:mod:`.pipeline`) and the transformers reference (:mod:`.hf_reference`)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout
CONF_DIR = ROOT / "src" / "detr_lightning" / "conf"
FIXTURES = ROOT / "tests" / "fixtures"
