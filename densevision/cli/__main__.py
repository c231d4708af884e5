import sys

from densevision.cli.commands import main

sys.exit(main())
