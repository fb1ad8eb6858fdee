#!/usr/bin/env python3
"""Train the MAGVIT-v2 FSQ tokenizer: ``python train.py +experiment=magvit64`` (see README)."""

from resilient_train.cli import main

if __name__ == "__main__":
    main()
