import sys

from throttled.cli import main

sys.exit(main())
