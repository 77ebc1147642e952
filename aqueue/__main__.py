import sys

from aqueue._cli import main

sys.exit(main())
