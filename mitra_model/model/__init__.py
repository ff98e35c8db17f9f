"""The model: Mitra's architecture (`architecture`, `kinds`), its one definition (`tab2d`), reading
and writing snapshots (`snapshot`), and the synthetic tabular inputs the matrix uses (`inputs`)."""
