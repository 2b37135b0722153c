"""Evaluation: loss/perplexity/accuracy, generation scored with BLEU-4 and ROUGE, multiple-choice benchmarks."""
