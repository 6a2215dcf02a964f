"""``python -m featseq``: the featseq command line."""
from featseq.cli import main

if __name__ == "__main__":
    main()
