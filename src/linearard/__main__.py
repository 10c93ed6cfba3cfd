import sys

from linearard.cli import main

sys.exit(main())
