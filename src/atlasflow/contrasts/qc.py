"""The within-session alignment's QC limits (torch-free: the planner and the CLI parser read them).

Measured on the open_ms patients (N4-corrected contrast onto the preprocessed T1w, normalised
mutual information on the 2 mm grid of the T1w's brain): 1.065-1.074 for FLAIR and T2w onto the
T1w of the same patient and session, 1.020-1.027 for another patient's FLAIR or T2w after its best
rigid alignment -- which also moved the head 26-35 mm from the scanner's coordinates, where the
same patient's scans moved at most 1 mm.
"""

#: The alignment must reach this normalised mutual information.
MIN_SESSION_NMI = 1.04
#: A within-session scan that moved further than this from the scanner's alignment is refused.
MAX_SESSION_SHIFT_MM = 20.0
