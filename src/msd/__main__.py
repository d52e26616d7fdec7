import sys

from msd.cli import main

sys.exit(main())
