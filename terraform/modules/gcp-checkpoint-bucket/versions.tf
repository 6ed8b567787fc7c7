terraform {
  # 1.5 is the oldest release exercised with this module; 2.x may change the
  # language, so it is excluded until tested.
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    google = {
      source = "hashicorp/google"
      # soft_delete_policy and the AbortIncompleteMultipartUpload lifecycle
      # action need a recent provider; 8.x is excluded until tested.
      version = ">= 6.0.0, < 8.0.0"
    }
  }
}
