import sys

from conveyor.app.cli import main

sys.exit(main())
