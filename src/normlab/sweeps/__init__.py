"""Sweeps: many configurations trained at once (`runner`), on a backend (`backends`), and the grid of run
directories of `normlab sweep` (`grid`)."""
