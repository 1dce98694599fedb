import sys

from kubeshim.cli import main

sys.exit(main())
