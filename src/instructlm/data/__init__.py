"""File in: instruction files and their formats, templates, token ids and labels, batches."""
