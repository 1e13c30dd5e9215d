import sys

from processserver.main import main

sys.exit(main())
