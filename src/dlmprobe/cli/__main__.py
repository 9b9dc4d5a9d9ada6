import sys

from dlmprobe.cli import main

sys.exit(main())
