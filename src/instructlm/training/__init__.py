"""Training: the settings, the budget, the step and its optimizer, preference losses,
checkpoints, several processes, the loop (fit) and the command (train)."""
