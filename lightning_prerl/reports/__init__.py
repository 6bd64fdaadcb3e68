"""Reports (layer 7): what a run leaves for people to look at.

Owns reading logged metrics (`logs`), the run's callbacks (CSV logger that resumes, policy export,
PNG report, end-of-run summary: `callbacks`, `summary`), the gradient-alignment diagnostic
(`alignment`), PNG figures (`plots`) and Hydra multirun sweeps (`sweep`). May import: every lower
layer (`objectives` ... `training`).
"""
