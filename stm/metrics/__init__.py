"""Scoring: language-modelling sums (`lm`) and the text metrics of generated targets (`text`)."""
