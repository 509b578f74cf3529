"""Video tasks: clips of frames, classified by an image backbone applied to every frame."""
