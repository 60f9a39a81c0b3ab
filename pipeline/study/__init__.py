"""The Drive-KD study on generated scenes (issue 10): plan (budgets, rows), run (subprocess stages), table."""
