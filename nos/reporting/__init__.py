"""The report of one run (`nos report`): what it reads (`data`), its pictures (`plots`,
`rollouts`) and its summary (`summary`). The command is `nos/report.py`."""
