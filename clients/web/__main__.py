import sys

from molteniron.clients.web.main import main

sys.exit(main())
