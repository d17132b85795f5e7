"""What every stage shares: params, typed records, provenance, the artefact layout, how a stage
runs, and the error the user can fix."""
