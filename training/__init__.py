"""clipteacher training: teachers, student, GLM, PLM, losses, loops. Kept import-free so torch-free
modules (training.kmeans, training.pseudo_vis, training.datasets) can be used without torch."""
