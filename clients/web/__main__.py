import sys

from clients.web.main import main

sys.exit(main())
