#!/usr/bin/env python3
"""export.py: the PyTorch reference Llama, and writers into run.c's file formats.

(skeleton: the model section is being written; the tokenizer section too)
"""

# ----------------------------------------------------------------------------
# Model export (owner: model section)

# ----------------------------------------------------------------------------
# Tokenizer export (owner: tokenizer section)

# ----------------------------------------------------------------------------
# Command line
