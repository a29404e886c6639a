"""HTTP layer: the QuartTrio app, schemas, OpenAPI document and error bodies."""
