from pyebm.cli import main
import sys
sys.exit(main())
