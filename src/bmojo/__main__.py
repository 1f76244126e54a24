import sys

from bmojo.cli import main

sys.exit(main())
