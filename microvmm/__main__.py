import sys

from microvmm.cli import main

sys.exit(main())
