"""The one contract training, export and the service share: the feature schema and model signature
(schema), the assembly of model inputs (inputs), the bundle format (bundle), the fixtures that make
model inputs (fixtures), the command-line error policy (errors) and the shadow record format
(shadow). It imports nothing else of the project, so each side agrees with the others by
construction."""
