"""The science of keyprep as plain, typed functions and small classes (no Nipype here)."""
