"""Files in and out: the one NIfTI reader/writer (images), atomic writes (atomic), ITK transform
files (itk), and the streaming voxel reader that cohort validation uses to check large files fast
(stream)."""
