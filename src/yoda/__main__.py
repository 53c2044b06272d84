import sys

from yoda.cli import main

sys.exit(main())
