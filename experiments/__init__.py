"""The orchestrators that chain the commands: the experiment runner (`dst experiment`), its grid files and
reports, and `dst demo`, an experiment config run by the same runner. Imports every other package."""
