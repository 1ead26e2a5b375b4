"""``python -m parity ...`` (see ``parity.cli``)."""
import sys

from parity.interrupts import install

install()  # before the heavy imports: Ctrl-C at any moment ends with exit 130 (parity.interrupts)

from parity.cli import main  # noqa: E402

sys.exit(main())
