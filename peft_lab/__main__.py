import sys

from peft_lab.cli import main

sys.exit(main())
