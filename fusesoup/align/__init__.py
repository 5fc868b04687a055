"""Cross-tokenizer alignment: tokens as bytes, vocabulary maps, and token alignments between tokenizations."""
