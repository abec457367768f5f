"""What the commands share to talk to a person: arguments and errors (`cli`), progress
(`progress`) and result tables (`tables`). Light on purpose: no torch at import."""
