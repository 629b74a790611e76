"""``python -m qlora_kit`` (and ``accelerate launch -m qlora_kit``) runs the CLI."""

import sys

from qlora_kit.cli import main

sys.exit(main())
