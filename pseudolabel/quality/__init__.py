"""Label quality: run the candidate chain on a gold set and score threshold choices against it."""
