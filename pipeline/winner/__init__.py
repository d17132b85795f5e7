"""The answer a user can use: the winner (the fine-tuned model, or the chosen frozen cell) as one
self-contained Keras classifier with its card, its mistakes on the test split, and predictions
on new images."""
