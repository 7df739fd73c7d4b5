import sys

from lens._cli import main

sys.exit(main())
