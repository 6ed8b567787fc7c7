terraform {
  # 1.5 brings `check` blocks and is the oldest release exercised with this
  # module; 2.x may change the language, so it is excluded until tested.
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 5.x and 6.x share the split S3 bucket resources used here
      # (aws_s3_bucket_versioning, _lifecycle_configuration, ...).
      version = ">= 5.40.0, < 7.0.0"
    }
  }
}
