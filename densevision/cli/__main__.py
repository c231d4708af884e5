import sys

from densevision.cli.main import main

sys.exit(main())
