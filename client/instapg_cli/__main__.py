import sys

from instapg_cli.cli import main

sys.exit(main())
