"""What can be searched: operands, ops, decays, schedules, the genome, mutation, symbolic form.

Pure code: no files, no database, no device choice.
"""
