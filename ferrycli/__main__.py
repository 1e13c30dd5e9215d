import sys

from ferrycli.main import main

sys.exit(main())
